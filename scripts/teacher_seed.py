"""Seed replicate of a teacher recipe: train, then score the EMA teacher on the test split (teacher row, shuffled-audio
control, ground truth; not the another-clip's-audio control, which costs a second full generation).

    OMP_NUM_THREADS=1 python scripts/teacher_seed.py RUN_DIR --seed 1 [TeacherConfig options, e.g. --audio_norm none]

Used for the teacher-v2 seed study (nbs/02b_teacher.ipynb, "Recipes compared over seeds")."""
import os, sys
from turbotalk.teacher import TeacherConfig, cli_parser, train_teacher, evaluate_teacher

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out, rest = argv[0], argv[1:]
    cfg = TeacherConfig(**vars(cli_parser().parse_args(['--out', out, *rest])))
    cmd = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python scripts/teacher_seed.py {' '.join(argv)}"
    train_teacher(cfg, cmd=cmd)
    evaluate_teacher(cfg.out, swapped=False)

if __name__ == '__main__': main()
