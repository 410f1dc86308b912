"""Typed errors: every failure a user can cause maps to one of these, with a message naming what was wrong."""


class EdgeclError(Exception):
    """Base of every error edgecl raises on purpose."""


class UsageError(EdgeclError, ValueError):
    """Bad argument or input from the caller (unknown name, wrong shape/dtype, task out of range). CLI exit code 2."""


class ArtifactError(EdgeclError):
    """An artifact file is unreadable, damaged, of another version, or inconsistent. Names the file and field."""

    def __init__(self, path: object, field: str, problem: str):
        self.path, self.field, self.problem = str(path), field, problem
        super().__init__(f"{self.path}: {field}: {problem}")


class BudgetError(EdgeclError):
    """A request would exceed the configured memory budget; names the budget and what was asked."""


class EdgeclWarning(UserWarning):
    """Something works but not as the user may expect (an old artifact's task that can be selected only by index)."""
