import sys

from mailpipe.stage import main
from packer.stage import PackerStage

sys.exit(main(PackerStage))
