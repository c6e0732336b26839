"""Run the chart's Argo CD health checks (``charts/kubelora/health/*.lua``) as Argo CD does, on real Lua 5.1.

Argo CD evaluates ``resource.customizations.health.<group>_<kind>`` in gopher-lua, a Lua 5.1, with the
object as the global table ``obj`` and only the base and table libraries open (no ``string``, ``math``,
``io`` or ``debug``; ``util/lua/lua.go``), and reads back ``{status, message}``; a status outside the four
it knows becomes ``Unknown``. :func:`health` does the same in a fresh ``lupa.lua51`` state per call: the JSON
object becomes nested Lua tables (nulls vanish, arrays start at 1), the script runs in an environment with
just those libraries and without the string metatable, so ``("x"):upper()`` fails here as it does there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lupa.lua51 as lua51

HEALTH_DIR = Path(__file__).resolve().parents[1] / "charts" / "kubelora" / "health"
SCRIPTS = {"LoRAJob": HEALTH_DIR / "lorajob.lua", "AdapterDeployment": HEALTH_DIR / "adapterdeployment.lua"}
"""Kind -> its health check; the argocd-cm key is ``resource.customizations.health.kubelora.io_<Kind>``."""
STATUSES = ("Healthy", "Progressing", "Degraded", "Suspended")

_SANDBOX = """
local script, obj = ...
local env = {obj = obj, table = table, _VERSION = _VERSION}
for _, name in ipairs({"assert", "error", "getmetatable", "ipairs", "next", "pairs", "pcall", "print",
                       "rawequal", "rawget", "rawset", "select", "setmetatable", "tonumber", "tostring",
                       "type", "unpack", "xpcall"}) do
  env[name] = _G[name]
end
env._G = env
local chunk = assert(loadstring(script, "=health.lua"))
setfenv(chunk, env)
debug.setmetatable("", nil)
return chunk()
"""


@dataclass(frozen=True)
class Health:
    status: str
    message: str


def key(kind: str) -> str:
    """The argocd-cm data key of ``kind``'s health check."""
    return f"resource.customizations.health.kubelora.io_{kind}"


def health(obj: dict[str, Any], script: str | None = None) -> Health:
    """Argo CD's verdict on ``obj`` (a LoRAJob or AdapterDeployment as JSON), from its kind's script."""
    source = script if script is not None else SCRIPTS[obj["kind"]].read_text()
    runtime = lua51.LuaRuntime(register_eval=False, register_builtins=False)
    result = runtime.execute(_SANDBOX, source, runtime.table_from(obj, recursive=True))
    assert lua51.lua_type(result) == "table", f"the script returned {result!r}, not a table"
    status, message = result["status"], result["message"]
    assert message is None or isinstance(message, str), f"message is {message!r}"
    return Health(status if status in STATUSES else "Unknown", message or "")
