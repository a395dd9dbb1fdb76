import sys

from dpo_lib.cli import main

sys.exit(main())
