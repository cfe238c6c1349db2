from . import interrupts

if __name__ == "__main__":  # the decode pool's processes may import the main module again
    interrupts.install()  # before the imports: a Ctrl-C at any moment is one line and exit 1
    try:
        from .cli import command

        code = command()
    except KeyboardInterrupt:
        print("aesthetic-dask: error: interrupted", flush=True, file=__import__("sys").stderr)
        code = interrupts.EXIT_FAILED
    interrupts.exit_on_signal(code)
    raise SystemExit(code)
