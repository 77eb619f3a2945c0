# Sourced by scripts/test and scripts/lock: makes `uv` callable, installing the pinned version
# with pip (one wheel, no dependencies) when the machine has none. uv never downloads a Python
# of its own here: the project runs on the machine's python3.
UV_VERSION=0.13.9
export UV_PYTHON_DOWNLOADS=never
if ! command -v uv >/dev/null 2>&1; then
    if ! python3 -m uv --version >/dev/null 2>&1; then
        echo "scripts: installing uv $UV_VERSION with pip"
        python3 -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" ||
            python3 -m pip install -q --disable-pip-version-check --user "uv==$UV_VERSION"
    fi
    uv() { python3 -m uv "$@"; }
fi
