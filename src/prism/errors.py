"""The errors a user can cause, in one torch-free module: the CLI catches these (exit code 2, one
line) without importing the heavy modules that raise them. Messages name the input and the problem."""


def yaml_problem(e: Exception) -> str:
    """A YAML parse error in one line: what is wrong and where ("expected ',' or ']' at line 2,
    column 1"), not PyYAML's multi-line excerpt."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


class PrismError(ValueError):
    """A problem with the user's input or files."""


class ConfigError(PrismError):
    """A config that cannot be used."""


class PersonaError(PrismError):
    """A persona file or name that cannot be used."""


class ModelLoadError(PrismError):
    """The model or tokenizer cannot be used."""


class RunError(PrismError):
    """The run directory cannot be used as asked."""


class DataError(PrismError):
    """Benchmark data that is missing or malformed."""


class RemoteError(PrismError):
    """An OpenAI-compatible server refused or could not be reached."""
