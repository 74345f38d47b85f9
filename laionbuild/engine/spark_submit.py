"""`laionbuild` under spark-submit, which takes a Python file rather than a console script:

    spark-submit --master yarn --conf spark.executor.memory=16g \\
        "$(python -c 'import laionbuild.engine.spark_submit as m; print(m.__file__)')" stage download --part 3

runs one laionbuild command as the spark-submit driver program; with `engine.master=active` its
stages use the session spark-submit configures (master, deploy settings, `--conf`)."""

import sys

if __name__ == "__main__":
    # spark-submit puts this file's folder first on sys.path; no module in it is named like a
    # standard-library one (tests/test_layout.py checks), so nothing there shadows it
    from laionbuild.cli import main

    sys.exit(main())
