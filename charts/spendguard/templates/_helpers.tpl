{{- define "spendguard.labels" -}}
app.kubernetes.io/part-of: spendguard
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
{{- define "spendguard.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
