{{- define "epp.name" -}}{{ .Release.Name }}-epp{{- end -}}
{{- define "epp.labels" -}}
app.kubernetes.io/name: epp
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: epp
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "epp.selectorLabels" -}}
app: {{ include "epp.name" . }}
{{- end -}}
{{- define "epp.legacy" -}}
{{- if eq .Values.inferencePool.apiVersion "inference.networking.x-k8s.io/v1alpha2" }}true{{ end -}}
{{- end -}}
{{- define "epp.selectorFlag" -}}
{{- $parts := list -}}
{{- range $k, $v := .Values.inferencePool.modelServers.matchLabels }}{{ $parts = append $parts (printf "%s=%s" $k $v) }}{{ end -}}
{{ join "," $parts }}
{{- end -}}
