"""The names of a checkpoint's files and directories on disk, defined once.

A converted model checkpoint (``tools/convert.py hf-to-mcore``)::

    <dir>/
        megatron_sega.json        METADATA_FILE: spec, padded vocab, dtype, format version
        tokenizer/                TOKENIZER_DIR: the tokenizer files that travel with the model
        metadata.json, .metadata, __*_*.distcp   (torch_dist's own files)

A training save directory (``checkpoint.save_dir``, see ``checkpoint.manager``)::

    <save_dir>/
        step_00000040/            step_dir_name(40): one complete checkpoint
            model_optim/          MODEL_OPTIM_DIR: a model checkpoint as above (+ optimizer)
            rng/rank_00003.pt     RNG_DIR / rng_file_name(3)
            train_state.json      TRAIN_STATE_FILE
            COMPLETE              COMPLETE_MARKER: written last, before the rename
        .tmp_step_00000044/       TMP_PREFIX + step name: a save in progress (its OWNER file:
                                  the run writing it, see checkpoint.retention)
        latest                    LATEST_FILE: name of the newest complete checkpoint
        STOPPED                   STOP_MARKER: the stage was stopped, not finished

No imports: ``checkpoint.stop`` (loaded before torch) and ``models`` use these too.
"""

METADATA_FILE = "megatron_sega.json"
TOKENIZER_DIR = "tokenizer"
MODEL_OPTIM_DIR = "model_optim"
RNG_DIR = "rng"
TRAIN_STATE_FILE = "train_state.json"
COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
STOP_MARKER = "STOPPED"
STEP_PREFIX = "step_"
STEP_GLOB = STEP_PREFIX + "*"
TMP_PREFIX = ".tmp_"


def step_dir_name(step: int) -> str:
    """``step_00000040``: zero-padded so that names sort by step."""
    return f"{STEP_PREFIX}{step:08d}"


def rng_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"
