import signal
import sys

# Imports take a moment; a SIGTERM that arrives before the stage installs its own handler must
# still end in a clean exit (nothing is in flight yet), not in death by signal.
signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))

from mailpipe.cli import main  # noqa: E402 (after the handler, on purpose)

sys.exit(main())
