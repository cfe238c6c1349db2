from . import interrupts

if __name__ == "__main__":  # the decode pool's processes may import the main module again
    interrupts.install()  # before the imports: a Ctrl-C at any moment is one line and exit 1
    interrupts.quiet_teardown()  # the first atexit callback registered, so the last to run
    try:
        from .cli import command
    except KeyboardInterrupt:  # while importing: command() handles every later one
        print("aesthetic-dask: error: interrupted", flush=True, file=__import__("sys").stderr)
        interrupts.exit_on_signal(interrupts.EXIT_FAILED)
        raise SystemExit(interrupts.EXIT_FAILED) from None
    raise SystemExit(command())
