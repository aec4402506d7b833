import sys

from distsrv.cli import main

sys.exit(main())
