# Determined sources this file before every trial, in the task container, from the
# experiment's working directory, under `set -e` and `set -x`. It must be idempotent,
# work offline and as non-root, never install torch (the image's CUDA build stays), and
# stop the trial with one clear line when the image cannot run it.
{ set +x; } 2>/dev/null        # Determined turns tracing off after this file anyway

# Determined 0.38 restores checkpoints (with numpy RNG state) through a plain torch.load,
# which torch >= 2.6 refuses unless weights-only loading is switched off.
export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1

# Installs nothing when the image has what the experiment's data.dataset needs; otherwise
# only the missing packages, with `pip install --user`; or one `startup-hook: error:` line.
"${DET_PYTHON_EXECUTABLE:-python3}" nas_data/needs.py
