"""``python -m limiter``: run the limiter stage."""

import sys

import mailpipe.stage
from limiter.stage import LimiterStage

sys.exit(mailpipe.stage.main(LimiterStage))
