"""Suite-wide set-up. The Ctrl-C tests need SIGINT to act: a suite started with SIGINT ignored (`nohup ... &` from a
shell without job control) would pass the ignored disposition on to every child across exec, and the tests would
fail for a reason that is not in the code. Give the run the default handler back before any test starts."""

import signal


def pytest_configure(config):
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
