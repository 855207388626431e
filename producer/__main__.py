import sys

from mailpipe.stage import main
from producer.stage import EnqueueStage

sys.exit(main(EnqueueStage))
