{{- define "kubelora.fullname" -}}{{ .Release.Name }}-operator{{- end -}}
{{- define "kubelora.labels" -}}
app.kubernetes.io/name: kubelora
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "kubelora.selector" -}}
app.kubernetes.io/name: kubelora
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}
{{- /* repository:tag, or repository:tag@sha256:... when image.digest is set (the runtime pulls by digest). */ -}}
{{- define "kubelora.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}{{ with .Values.image.digest }}@{{ . }}{{ end }}
{{- end -}}
{{- /* The labels every AdapterDeployment pod carries (operator/kubelora/resources/serving_common.py server_labels). */ -}}
{{- define "kubelora.servingPods" -}}
app.kubernetes.io/name: kubelora-server
app.kubernetes.io/managed-by: kubelora-operator
app.kubernetes.io/component: server
{{- end -}}
