import sys

from beit3.cli import main

sys.exit(main())
