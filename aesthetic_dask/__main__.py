from .cli import main

if __name__ == "__main__":  # the decode pool's processes may import the main module again
    raise SystemExit(main())
