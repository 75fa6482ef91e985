"""One process of a multi-process CPU run for tests/test_multiprocess.py (not a test module).

    python tests/multiprocess_worker.py DATA_DIR WORKDIR TEACHER_DIR TOTAL_STEPS [LEARNING_RATE]

The process layout comes from the environment: TITANS_COORDINATOR_ADDRESS, TITANS_NUM_PROCESSES,
TITANS_PROCESS_ID, and XLA_FLAGS for the number of CPU devices of this process. Prints one JSON line
"RESULT {...}" at the end.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU

from helpers import digits_config

from titans import train


def main():
    data_dir, workdir, teacher_dir, total_steps = sys.argv[1:5]
    c = digits_config(data_dir, total_steps=int(total_steps))
    c.batch_size = 64
    c.eval_batch_size = 64
    c.log_every_steps = 2
    c.checkpoint.every_steps = 3
    c.model.kwargs.hidden = (16,)
    c.distill.teacher_workdir = teacher_dir
    if len(sys.argv) > 5:
        c.optimizer.learning_rate = float(sys.argv[5])
    result = train.train_and_evaluate(c, workdir)
    print(
        "RESULT "
        + json.dumps(
            {
                "process_index": jax.process_index(),
                "process_count": jax.process_count(),
                "devices": len(jax.devices()),
                "accuracy": result["accuracy"],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
