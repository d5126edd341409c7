# Determined sources this file (under `set -e`) before every trial starts, in the task
# container, from the experiment's working directory. It must be idempotent, must not
# install torch (the image's CUDA build stays), and must fail loudly: a failing command
# here stops the trial before it starts.

# Determined 0.38 restores checkpoints (with numpy RNG state) through a plain torch.load,
# which torch >= 2.6 refuses unless weights-only loading is switched off.
export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1

# Python packages the trial imports that a Determined PyTorch image may lack (torch,
# torchvision and determined come with the image and are never installed here).
_nas_missing=$(python3 - <<'PY'
import importlib.util
wanted = {"yaml": "pyyaml", "numpy": "numpy", "PIL": "pillow", "sklearn": "scikit-learn",
          "matplotlib": "matplotlib"}
print(" ".join(pkg for mod, pkg in wanted.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "${_nas_missing}" ]; then
    echo "startup-hook: installing ${_nas_missing}"
    python3 -m pip install --quiet --no-input ${_nas_missing} || {
        echo "startup-hook: could not install ${_nas_missing} (no network? bake them into the image)" >&2
        false
    }
fi
unset _nas_missing

python3 -c "import torch, torchvision, determined; print('startup-hook: torch', torch.__version__, '| torchvision', torchvision.__version__, '| determined', determined.__version__, '| cuda', torch.cuda.is_available())" || {
    echo "startup-hook: the image lacks torch, torchvision or determined" >&2
    false
}
