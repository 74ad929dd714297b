import sys

from fs_engine.cli import main

sys.exit(main())
