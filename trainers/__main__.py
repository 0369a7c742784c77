"""`python -m trainers`: run this process's rank of a job (see trainers.main and trainers.env)."""

import sys

from trainers.main import main

sys.exit(main())
