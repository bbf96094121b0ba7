"""Fills the placeholders of the bootstraps under envoy/: {{NAME}} values and {{CHAIN:file}}."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENVOY_DIR = ROOT / "envoy"


def render(path, values):
    text = Path(path).read_text()

    def chain(match):
        indent, name = match.group(1), match.group(2)
        body = (ENVOY_DIR / "chains" / f"{name}.yaml").read_text().rstrip("\n")
        return "\n".join(indent + line if line else line for line in body.splitlines())

    text = re.sub(r"^([ \t]*)\{\{CHAIN:([\w-]+)\}\}$", chain, text, flags=re.M)
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]), text)
    return text


def bundled_bootstraps(form):
    return sorted(ENVOY_DIR.glob(f"*{form}*.yaml"))
