-- Argo CD health check for kubelora.io/LoRAJob (argocd-cm key resource.customizations.health.kubelora.io_LoRAJob).
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
    hs.message = "LoRAJob is " .. tostring(status.phase or "Pending")
  end
  return hs
end

-- Stalled before observedGeneration is first written: the operator could not apply even generation 1
-- (a create refused by quota or RBAC). kstatus reads this as Failed too.
if isTrue("Stalled") then
  return say("Degraded", "Stalled")
end
if status.phase == "Failed" then
  return say("Degraded", "Succeeded")
end
if status.observedGeneration == nil then
  return waiting()
end
-- spec.suspend: true, as asked: like a suspended batch/v1 Job. A Queued run is Reconciling (below).
if status.phase == "Suspended" then
  return say("Suspended", "Ready")
end
if isTrue("Reconciling") then
  return say("Progressing", "Reconciling")
end
if isTrue("Ready") then
  return say("Healthy", "Ready")
end
return say("Progressing", "Ready")
