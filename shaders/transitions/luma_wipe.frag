#version 330
// Transition "luma wipe": the live picture appears through its own brightness, the
// brightest parts first, the darkest last. u_softness is the width of the wipe's edge
// in luminance (0 = a hard edge).
uniform sampler2D u_from;
uniform sampler2D u_input;
uniform float u_progress;
uniform float u_softness;
in vec2 uv;
out vec4 frag;
void main() {
    vec3 to = texture(u_input, uv).rgb;
    float luma = dot(to, vec3(0.2126, 0.7152, 0.0722));
    // the edge sweeps the luminance range from 1 (progress 0) to 0 (progress 1),
    // widened by the softness so that both ends are exact (all old / all new)
    float edge = mix(1.0 + u_softness, 0.0, u_progress);
    float show = u_progress >= 1.0 ? 1.0 : smoothstep(edge - u_softness, edge, luma + 1e-4);
    frag = vec4(mix(texture(u_from, uv).rgb, to, show), 1.0);
}
