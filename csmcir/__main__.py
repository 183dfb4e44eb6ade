import sys

from csmcir.cli import main

sys.exit(main())
