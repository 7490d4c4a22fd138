import sys

from klein_ray.cli import main

sys.exit(main())
