"""`python -m mortar.frontends.fuse [-o OPTIONS] HOST:/VOLUME|--volfile FILE MOUNTPOINT`."""

import sys

from mortar.frontends.fuse.mount import main

if __name__ == "__main__":
    sys.exit(main())
