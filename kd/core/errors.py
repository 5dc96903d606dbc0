"""One exception type for every user-facing failure: the CLI prints its message and exits 2."""


class KdError(Exception):
    """A failure the user can fix (bad param, missing file, corrupt artefact). Message says how."""


class ParamError(KdError):
    """A params.yaml value is missing, of the wrong type, or out of range."""

    def __init__(self, key: str, problem: str, allowed: str | None = None):
        msg = f"params: `{key}` {problem}"
        if allowed:
            msg += f" (allowed: {allowed})"
        super().__init__(msg)
        self.key = key


class ArtefactError(KdError):
    """A stage input on disk is missing, truncated or does not match its manifest."""
