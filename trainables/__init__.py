"""Everything that runs inside a trial; never imports :mod:`search`.

Importing this package loads neither torch nor Ray: the driver validates configs against
:mod:`trainables.params` and the registry metadata before anything heavy starts.
"""

from trainables._no_triton import keep_triton_out

keep_triton_out()
