{{/*
Ways in from outside the cluster, shared by MLflow and the model server: an Ingress and a
Gateway API HTTPRoute to a component's Service.
usage: include "mmjobs.ingress" (list . "mlflow" .Values.mlflow)
*/}}

{{- define "mmjobs.ingress" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $values := index . 2 }}
{{- $ingress := $values.ingress }}
{{- if not $ingress.hosts }}
{{- fail (printf "\n\ninvalid values for the mmjobs chart:\n  - %s.ingress.hosts: list at least one host name when %s.ingress.enabled is true, e.g. [%s.example.com]\n" $component $component $component) }}
{{- end }}
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: {{ include "mmjobs.componentName" (list $root $component) }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "mmjobs.componentLabels" (list $root $component) | nindent 4 }}
  {{- with $ingress.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $ingress.className }}
  ingressClassName: {{ . }}
  {{- end }}
  {{- with $ingress.tls }}
  tls:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  rules:
    {{- range $ingress.hosts }}
    - host: {{ . | quote }}
      http:
        paths:
          - path: {{ $ingress.path }}
            pathType: Prefix
            backend:
              service:
                name: {{ include "mmjobs.componentName" (list $root $component) }}
                port:
                  name: http
    {{- end }}
{{- end }}

{{- define "mmjobs.httpRoute" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $values := index . 2 }}
{{- $route := $values.httpRoute }}
{{- if not $route.parentRefs }}
{{- fail (printf "\n\ninvalid values for the mmjobs chart:\n  - %s.httpRoute.parentRefs: name the Gateway the route attaches to when %s.httpRoute.enabled is true, e.g. [{name: public, namespace: gateway-system}]\n" $component $component) }}
{{- end }}
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: {{ include "mmjobs.componentName" (list $root $component) }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "mmjobs.componentLabels" (list $root $component) | nindent 4 }}
  {{- with $route.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  parentRefs:
    {{- toYaml $route.parentRefs | nindent 4 }}
  {{- with $route.hostnames }}
  hostnames:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  rules:
    - matches:
        - path:
            type: PathPrefix
            value: {{ $route.path }}
      backendRefs:
        - name: {{ include "mmjobs.componentName" (list $root $component) }}
          port: {{ $values.service.port }}
{{- end }}
