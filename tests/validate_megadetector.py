"""Runs MegaDetector's own validators on an export (with the venv `make setup-tests` makes), and prints
one JSON line: {"errors": [...], "warnings": [...]}.

usage: validate_megadetector.py batch FILE   (validate_batch_results: the batch output format)
       validate_megadetector.py cct FILE     (integrity_check_json_db: COCO Camera Traps)

The command-line forms of both print and exit 0 whatever they find, so the functions are called.
"""

import json
import sys


def main():
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "batch":
        from megadetector.postprocessing.validate_batch_results import (ValidateBatchResultsOptions,
                                                                          validate_batch_results)
        options = ValidateBatchResultsOptions()
        found = validate_batch_results(path, options)["validation_results"]
        print(json.dumps({"errors": found["errors"], "warnings": found["warnings"]}))
    elif mode == "cct":
        from megadetector.data_management.integrity_check_json_db import (IntegrityCheckOptions,
                                                                          integrity_check_json_db)
        options = IntegrityCheckOptions()
        options.verbose = False
        options.nThreads = 1
        try:
            _, _, error_info = integrity_check_json_db(path, options)
            errors = [str(e) for e in (error_info or {}).get("validation_errors", []) or []]
        except AssertionError as e:
            errors = [f"assertion failed: {e}"]
        print(json.dumps({"errors": errors, "warnings": []}))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
