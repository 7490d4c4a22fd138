"""Assets a render needs, fetched and prepared: reference images (and where they may be read
from), model sources synced to a node, compiled kernels kept between actors. No torch here."""
