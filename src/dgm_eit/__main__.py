from dgm_eit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
