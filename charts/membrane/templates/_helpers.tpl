{{/* The image of both roles. */}}
{{- define "membrane.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "membrane.labels" -}}
app.kubernetes.io/part-of: membrane
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "membrane.operatorServiceAccount" -}}
{{ .Values.serviceAccounts.operator.name }}
{{- end -}}

{{- define "membrane.agentServiceAccount" -}}
{{ .Values.serviceAccounts.agent.name }}
{{- end -}}

{{/*
The Ingress controller's flags, named like `membrane up`'s (IngressFlags)
and Cilium's operator flags.
*/}}
{{- define "membrane.ingressArgs" -}}
{{- $ic := .Values.ingressController }}
- --ingress-default-lb-mode={{ $ic.loadbalancerMode }}
- --enforce-ingress-https={{ $ic.enforceHttps }}
{{- if $ic.enableProxyProtocol }}
- --enable-ingress-proxy-protocol
{{- end }}
{{- with $ic.ingressLBAnnotationPrefixes }}
- --ingress-lb-annotation-prefixes={{ join "," . }}
{{- end }}
{{- if and $ic.defaultSecretNamespace $ic.defaultSecretName }}
- --ingress-default-secret-namespace={{ $ic.defaultSecretNamespace }}
- --ingress-default-secret-name={{ $ic.defaultSecretName }}
{{- end }}
{{- if $ic.hostNetwork.enabled }}
- --ingress-host-network
- --ingress-host-network-shared-listener-port={{ $ic.hostNetwork.sharedListenerPort }}
{{- with $ic.hostNetwork.nodes.matchLabels }}
{{- $sel := list }}
{{- range $k, $v := . }}
{{- $sel = append $sel (printf "%s=%s" $k $v) }}
{{- end }}
- --ingress-host-network-node-label-selector={{ join "," $sel }}
{{- end }}
{{- end }}
{{- end -}}
