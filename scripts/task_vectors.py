"""Run the task-vector studies (transfer, addition, negation) from one config.

    python scripts/task_vectors.py --config configs/taskvector.yaml --data.data_dir ../shared/data
    python scripts/task_vectors.py --config configs/taskvector.yaml --quick   # smoke run
    python scripts/task_vectors.py --config configs/taskvector.yaml --print_config

Writes <out_dir>/task_vectors.md and CSVs; checkpoints and TensorBoard logs go to <work_dir>,
and a stage whose checkpoint exists there (with the same settings) is reused. See
music/task_vector_study.py for what each study does.
"""

from music.task_vector_study import main

if __name__ == "__main__":
    main()
