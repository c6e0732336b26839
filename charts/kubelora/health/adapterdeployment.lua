-- Argo CD health check for kubelora.io/AdapterDeployment
-- (argocd-cm key resource.customizations.health.kubelora.io_AdapterDeployment).
-- It reads the Ready/Reconciling/Stalled contract of operator/kubelora/api/reasons.py; docs/argocd.md has the
-- table. Argo CD runs it in gopher-lua (Lua 5.1) with the base and table libraries only: no string library.
local hs = {}
local status = obj.status
local generation = obj.metadata.generation

local function waiting()
  hs.status = "Progressing"
  hs.message = "waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

-- The status describes an older spec (or none yet): nothing in it is about this generation.
if status == nil or (status.observedGeneration ~= nil and status.observedGeneration ~= generation) then
  return waiting()
end

local conditions = {}
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    conditions[condition.type] = condition
  end
end

local function isTrue(conditionType)
  return conditions[conditionType] ~= nil and conditions[conditionType].status == "True"
end

local function say(healthStatus, conditionType)
  hs.status = healthStatus
  local condition = conditions[conditionType]
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    hs.message = condition.message
  elseif status.message ~= nil and status.message ~= "" then
    hs.message = status.message
  else
    hs.message = "AdapterDeployment is " .. tostring(status.phase or "Pending")
  end
  return hs
end

if isTrue("Stalled") then
  return say("Degraded", "Stalled")
end
if status.observedGeneration == nil then
  return waiting()
end
-- Serving with a flaw (a failed adapter, a lost replica): the user has something to look at, even while
-- other adapters still load.
if isTrue("Degraded") or status.phase == "Degraded" or status.phase == "Failed" then
  return say("Degraded", "Degraded")
end
if isTrue("Reconciling") then
  return say("Progressing", "Reconciling")
end
if isTrue("Ready") then
  return say("Healthy", "Ready")
end
return say("Progressing", "Ready")
