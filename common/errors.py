"""The one exception type users see.

Every error that comes from bad input (unknown model, bad config key, malformed record, prompt too long, ...)
is a `DopdError` whose message names the problem and, where there is one, the fix. The CLI prints these
without a traceback; anything else is a bug and keeps its traceback.
"""


class DopdError(Exception):
    """Bad input or an unmet precondition, with a message meant for the user."""


class ConfigError(DopdError):
    """A config file or key=value override that does not fit the typed config."""


class ModelError(DopdError):
    """A target or drafter that cannot be resolved, loaded, or paired."""


class RecordError(DopdError):
    """Experience-record bytes that do not decode: truncated, oversized, garbage, or another schema."""


class PromptError(DopdError):
    """A prompt set or prompt that cannot be used (empty, malformed, too long for the context)."""
