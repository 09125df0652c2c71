import sys

from pixelcnn_kernels.cli import main

sys.exit(main())
