import sys

import mailpipe.stage
from sender.stage import SenderStage

sys.exit(mailpipe.stage.main(SenderStage))
