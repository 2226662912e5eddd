"""Push a checkpoint folder to the Hugging Face Hub (or any server speaking its API) with huggingface_hub.

The push only reads the folder: whatever fails (no token, 401/403, 404, a network error, a server error, a timeout),
the local checkpoint is untouched, the error is one line that says so, and running the same push again is safe
(the repo and branch are created with ``exist_ok``, an upload of unchanged files is a no-op commit).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .errors import BadOption, ExportError
from .evaluate import is_checkpoint

__all__ = ["DEFAULT_COMMIT_MESSAGE", "check_push_target", "push_checkpoint"]

DEFAULT_COMMIT_MESSAGE = "Upload ActTail checkpoint (acttail-export)"
_STATUS_HINTS = {
    401: ": the token is missing or invalid; log in with `hf auth login` or set HF_TOKEN",
    403: ": the token has no write access to this repo or its namespace",
    404: ": the repo, its namespace or the revision does not exist (or is hidden from this token)",
}


def check_push_target(repo_id: str, endpoint: str | None = None, token: str | None = None) -> None:
    """Everything about a push that can be checked without the network: the repo id, the endpoint URL and a token.

    :param repo_id: ``ORG/NAME`` (a user name works as ORG)
    :param endpoint: Hub URL; None: ``HF_ENDPOINT`` or https://huggingface.co
    :param token: None: the token huggingface_hub finds (``HF_TOKEN``, then ``hf auth login``'s file)
    """
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("expected ORG/NAME")
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise BadOption(f"bad Hub repo id {repo_id!r}: {str(e).splitlines()[0]}") from None
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise BadOption(f"--endpoint must be an http:// or https:// URL, got {endpoint!r}")
    if token is None and get_token() is None:
        raise ExportError("no Hugging Face token found: log in with `hf auth login` or set HF_TOKEN")


def push_checkpoint(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                    commit_message: str | None = None, endpoint: str | None = None, token: str | None = None) -> str:
    """Create ``repo_id`` if needed (and branch ``revision``), upload every file of ``folder``; return the commit URL.

    :param folder: an ActTail checkpoint folder (refused otherwise, before any network call)
    :param private: create the repo private (an existing repo keeps its visibility)
    :param revision: branch to commit to, created from main if missing; None: main
    :param endpoint: Hub URL; passed to HfApi explicitly because ``HF_ENDPOINT`` is only read at import time
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not is_checkpoint(str(folder)):
        raise ExportError(f"{folder} is not an ActTail checkpoint folder (no config.json with activation_sparsity)")
    check_push_target(repo_id, endpoint, token)
    api = HfApi(endpoint=endpoint, token=token)
    step = f"creating repo {repo_id}"
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True)  # None: the namespace's default visibility
        if revision not in (None, "main"):
            step = f"creating branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "uploading the files"
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision,
                                   commit_message=commit_message or DEFAULT_COMMIT_MESSAGE)
    except Exception as e:
        # Any exception, as the HTTP client's and the Xet uploader's error types differ between huggingface_hub versions;
        # whatever failed, the folder was only read and the same push can run again.
        retry = _push_command(folder, repo_id, private, revision, commit_message, endpoint)
        raise ExportError(f"push to {repo_id} at {api.endpoint} failed while {step}: {_reason(e)}; "
                          f"the local checkpoint at {folder} is intact; retry with `{retry}`") from e
    return commit.commit_url


def _reason(error: Exception) -> str:
    """One line for a failed request: the HTTP status with a hint for the usual ones, else the error's first line."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code
        server = f" ({error.server_message.strip().splitlines()[0]})" if error.server_message else ""
        return f"the server answered {status}{server}{_STATUS_HINTS.get(status, '')}"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"


def _push_command(folder: Path, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
                  endpoint: str | None) -> str:
    """The ``acttail-export push`` command that repeats this push."""
    args = ["acttail-export", "push", str(folder), repo_id]
    args += ["--private"] if private else []
    args += ["--revision", revision] if revision else []
    args += ["--commit-message", commit_message] if commit_message else []
    args += ["--endpoint", endpoint] if endpoint else []
    return shlex.join(args)
