import sys

from inbound.stage import InboundStage
from mailpipe.stage import main

sys.exit(main(InboundStage))
