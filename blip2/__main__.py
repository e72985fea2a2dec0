import sys

from blip2.cli import main

sys.exit(main())
