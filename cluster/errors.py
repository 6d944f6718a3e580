"""Why a run could not start on the cluster. Kept free of Ray so that the CLI can catch these
without importing it: they are the user's to fix (resources, models on nodes), reported like bad
config, with exit status 2 and no traceback."""


class LaunchError(RuntimeError):
    """The run's actors could not be started; nothing was trained."""


class PlacementError(LaunchError):
    """The cluster cannot hold the requested actors."""


class RoleStartError(LaunchError):
    """A replica's constructor failed (for instance, its model is missing on its node)."""
