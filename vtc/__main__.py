"""``python -m vtc ...`` (and ``accelerate launch -m vtc eval ...``): the ``vtc`` command."""
from .cli import main

raise SystemExit(main())
