"""Validates a Camtrap DP export (a ZIP) with frictionless against the vendored Camtrap DP 1.0.2
profile and table schemas (tests/camtrap-dp), with no network, and prints one JSON line:
{"valid": bool, "errors": [...], "files": [...], "package": {datapackage.json},
 "tables": {"deployments": [{column: value}, ...], "media": [...], "observations": [...]}}.

usage: validate_camtrap_dp.py EXPORT.zip

As the camtrap-dp repository's own tests do, the profile and schemas are served on loopback and
the package's URLs are pointed at them. The served paths keep `1.0.2` in them, so the profile's rule
that each schema URL names its version still holds. The profile's two external `$ref`s get local
stand-ins: the Data Package schema becomes `{}` (frictionless checks every package against its own
Data Package profile anyway) and the GeoJSON schema is the one frictionless ships.
"""

import csv
import functools
import http.server
import json
import os
import pathlib
import sys
import tempfile
import threading
import zipfile

HERE = pathlib.Path(__file__).parent
VENDORED = HERE / "camtrap-dp" / "1.0.2"
DATA_PACKAGE = "https://specs.frictionlessdata.io/schemas/data-package.json"
GEOJSON = "http://json.schemastore.org/geojson.json"
TABLES = ("deployments", "media", "observations")


def serve(root):
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main():
    import frictionless

    export = sys.argv[1]
    with tempfile.TemporaryDirectory() as work:
        work = pathlib.Path(work)
        site = work / "site"
        served = site / "tdwg" / "camtrap-dp" / "1.0.2"
        served.mkdir(parents=True)
        server, base = serve(site)
        profile = (VENDORED / "camtrap-dp-profile.json").read_text()
        profile = profile.replace(DATA_PACKAGE, f"{base}/data-package.json")
        profile = profile.replace(GEOJSON, f"{base}/geojson.json")
        (served / "camtrap-dp-profile.json").write_text(profile)
        for table in TABLES:
            name = f"{table}-table-schema.json"
            (served / name).write_text((VENDORED / name).read_text())
        (site / "data-package.json").write_text("{}")
        shipped = pathlib.Path(frictionless.__file__).parent / "assets" / "profiles" / "geojson.json"
        (site / "geojson.json").write_text(shipped.read_text())

        package_dir = work / "package"
        with zipfile.ZipFile(export) as z:
            names = sorted(z.namelist())
            z.extractall(package_dir)
        descriptor = json.loads((package_dir / "datapackage.json").read_text())
        published = "https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2/"
        errors = []
        if descriptor.get("profile") != published + "camtrap-dp-profile.json":
            errors.append(f"profile is {descriptor.get('profile')!r}")
        descriptor["profile"] = f"{base}/tdwg/camtrap-dp/1.0.2/camtrap-dp-profile.json"
        for resource in descriptor.get("resources", []):
            if resource.get("name") in TABLES:
                expected = f"{published}{resource['name']}-table-schema.json"
                if resource.get("schema") != expected:
                    errors.append(f"{resource['name']}: schema is {resource.get('schema')!r}")
                resource["schema"] = f"{base}/tdwg/camtrap-dp/1.0.2/{resource['name']}-table-schema.json"
        # frictionless reads resources relative to the working directory.
        os.chdir(package_dir)
        report = frictionless.validate(descriptor)
        errors += [f"{e.type}: {e.note}" for e in report.errors]
        for task in report.tasks:
            errors += [f"{task.name}: {e.type}: {e.message}" for e in task.errors]
        tables = {}
        for table in TABLES:
            with open(package_dir / f"{table}.csv", newline="", encoding="utf-8") as f:
                tables[table] = list(csv.DictReader(f))
        server.shutdown()
        package = json.loads((package_dir / "datapackage.json").read_text())
        valid = report.valid and not errors
        print(json.dumps({"valid": valid, "errors": errors, "files": names, "package": package, "tables": tables}))


if __name__ == "__main__":
    main()
