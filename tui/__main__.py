"""``python -m tui --agent SOCKET …``: the monitor without the godwit CLI around it."""

import sys

from tui.app import main

sys.exit(main())
