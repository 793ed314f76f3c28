"""Measure this machine into a HardwareProfile JSON.

  python -m experiments.profile_hardware --workdir=/tmp/hetflow-profile --out=hardware_profile.json
  python -m experiments.profile_hardware --quick   # seconds; indicative figures only

Needs a few hundred MB free in --workdir (on the disk to measure) and ~1.2 GiB
of RAM. Run as root to drop the page cache (else fadvise is used).
"""

from absl import app, flags

from hetflow.bench.probes import measure

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory on the disk to measure (default: a temp dir)."
)
_OUT = flags.DEFINE_string("out", "./hardware_profile.json", "Where to write the profile JSON.")
_QUICK = flags.DEFINE_bool("quick", False, "Small sizes: seconds instead of a minute or two.")
_NAME = flags.DEFINE_string("name", None, "Profile name (default: host name).")


def main(argv):
  del argv
  import tempfile

  with tempfile.TemporaryDirectory(prefix="hetflow-profile-") as tmp:
    profile = measure(_WORKDIR.value or tmp, quick=_QUICK.value, name=_NAME.value)
  print(profile.table())
  profile.to_json(_OUT.value)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
