"""Runs a command as the terminal's foreground process group, and exits with its status.

`make run` uses it so that Ctrl-C reaches the demo alone: the demo stops Envoy and the upstream,
cleans up and exits 0, and make, which never saw the signal, exits 0 too (GNU make that gets
SIGINT always dies of it, whatever its recipe did). Without a terminal it just runs the command.
"""

import os
import signal
import subprocess
import sys


def main():
    argv = sys.argv[1:]
    try:
        tty = os.open("/dev/tty", os.O_RDWR)
        before = os.tcgetpgrp(tty)
    except OSError:
        os.execvp(argv[0], argv)

    def take_terminal():
        os.setpgid(0, 0)
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a background group may not set it otherwise
        os.tcsetpgrp(tty, os.getpgrp())
        signal.signal(signal.SIGTTOU, signal.SIG_DFL)

    child = subprocess.Popen(argv, preexec_fn=take_terminal)
    try:
        status = child.wait()
    finally:
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        os.tcsetpgrp(tty, before)
    sys.exit(status if status >= 0 else 128 - status)


if __name__ == "__main__":
    main()
