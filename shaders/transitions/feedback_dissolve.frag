#version 330
// Transition "feedback dissolve": the last output feeds back into itself, zoomed and
// turned a little each frame, while the live picture dissolves in through per-pixel
// noise. u_previous is the previous output frame (this pass's own result one frame ago),
// so the old picture flows outwards in trails as it dissolves.
uniform sampler2D u_previous;
uniform sampler2D u_input;
uniform float u_progress;
uniform float u_zoom;      // >1 flows outwards
uniform mat2 u_rotation;
uniform vec2 u_resolution;
in vec2 uv;
out vec4 frag;

float hash(vec2 p) {  // a fixed per-pixel threshold: the dissolve pattern does not flicker
    p = fract(p * vec2(0.1031, 0.1030));
    p += dot(p, p.yx + 33.33);
    return fract((p.x + p.y) * p.x);
}

void main() {
    vec3 live = texture(u_input, uv).rgb;
    vec2 aspect = vec2(u_resolution.x / u_resolution.y, 1.0);
    vec2 q = u_rotation * ((uv - 0.5) * aspect) / (aspect * u_zoom) + 0.5;
    vec3 trail = texture(u_previous, q).rgb;
    float threshold = hash(floor(gl_FragCoord.xy));
    float show = u_progress >= 1.0 ? 1.0 : step(threshold, u_progress);
    frag = vec4(mix(trail, live, show), 1.0);
}
